"""Subject / relation / object facts for CounterFact-style evaluation, written in code (no data set download).

Each relation has one edit prompt and paraphrases ("{}" = subject). `candidates()` lists every fact; which of
them a model knows is decided by `evaluate.known_facts` before any edit (p(object | prompt) > 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

RELATIONS = {
    "capital": ("The capital of {} is", ["The capital city of {} is", "{} has its capital in the city of"]),
    "language": ("The official language of {} is", ["The main language spoken in {} is", "In {}, most people speak"]),
    "city_country": ("{} is a city in the country of", ["The city of {} is located in the country of",
                                                        "{} is one of the largest cities in"]),
    "landmark_city": ("The {} is located in the city of", ["The {} can be found in the city of",
                                                           "Tourists visit the {} in the city of"]),
    "company_country": ("The company {} is headquartered in the country of",
                        ["{} is a company from the country of", "The firm {} was founded in the country of"]),
    "person_country": ("{} was born in the country of", ["{} came from the country of",
                                                         "The birthplace of {} is the country of"]),
}

_CAPITALS = """France Paris|Germany Berlin|Italy Rome|Spain Madrid|Japan Tokyo|China Beijing|Russia Moscow|
England London|Egypt Cairo|Greece Athens|Portugal Lisbon|Austria Vienna|Poland Warsaw|Ireland Dublin|Norway Oslo|
Sweden Stockholm|Finland Helsinki|Denmark Copenhagen|Hungary Budapest|Turkey Ankara|Thailand Bangkok|Kenya Nairobi|
Peru Lima|Cuba Havana|Iran Tehran|Iraq Baghdad|Canada Ottawa|Australia Canberra|South Korea Seoul|Belgium Brussels|
Netherlands Amsterdam|Switzerland Bern|Romania Bucharest|Ukraine Kyiv|Vietnam Hanoi|Indonesia Jakarta|
Philippines Manila|Chile Santiago|Venezuela Caracas|Syria Damascus|Lebanon Beirut|Saudi Arabia Riyadh|
Pakistan Islamabad|Nigeria Abuja|Morocco Rabat|Scotland Edinburgh|Wales Cardiff|Afghanistan Kabul|Nepal Kathmandu|
Bulgaria Sofia|Serbia Belgrade|Croatia Zagreb|Iceland Reykjavik|Argentina Buenos Aires|India New Delhi|
Colombia Bogota|Ethiopia Addis Ababa|Mexico Mexico City|Czech Republic Prague|Jordan Amman|Qatar Doha"""

_LANGUAGES = """France French|Germany German|Italy Italian|Spain Spanish|Japan Japanese|China Chinese|Russia Russian|
Brazil Portuguese|Portugal Portuguese|Greece Greek|Poland Polish|Netherlands Dutch|Sweden Swedish|Norway Norwegian|
Finland Finnish|Denmark Danish|Turkey Turkish|Egypt Arabic|Iran Persian|Israel Hebrew|South Korea Korean|
Thailand Thai|Vietnam Vietnamese|Hungary Hungarian|Mexico Spanish|Argentina Spanish|Austria German|Ukraine Ukrainian|
Romania Romanian|Indonesia Indonesian|Saudi Arabia Arabic|England English|Australia English|Chile Spanish|
Colombia Spanish|Peru Spanish|Cuba Spanish|Iceland Icelandic|Bulgaria Bulgarian|Serbia Serbian"""

_CITIES = """Paris France|Berlin Germany|Tokyo Japan|Rome Italy|Madrid Spain|Moscow Russia|Beijing China|Shanghai China|
Toronto Canada|Sydney Australia|Mumbai India|Cairo Egypt|Istanbul Turkey|Athens Greece|Lisbon Portugal|
Vienna Austria|Amsterdam Netherlands|Stockholm Sweden|Dublin Ireland|Warsaw Poland|Munich Germany|Milan Italy|
Barcelona Spain|Osaka Japan|Kyoto Japan|Bangkok Thailand|Hamburg Germany|Venice Italy|Florence Italy|Naples Italy|
Lyon France|Marseille France|Montreal Canada|Vancouver Canada|Melbourne Australia|Delhi India|Havana Cuba|
Manchester England|Liverpool England|Budapest Hungary|Oslo Norway|Helsinki Finland|Copenhagen Denmark|
Zurich Switzerland|Geneva Switzerland|Brussels Belgium|Tehran Iran|Baghdad Iraq|Nairobi Kenya|Lagos Nigeria|
Lima Peru|Hanoi Vietnam|Jakarta Indonesia|Manila Philippines|Karachi Pakistan|Frankfurt Germany|Seville Spain|
Porto Portugal|Krakow Poland|Bordeaux France|Nice France|Turin Italy|Cologne Germany|Rio de Janeiro Brazil|
Buenos Aires Argentina|Mexico City Mexico|Beirut Lebanon|Damascus Syria|Casablanca Morocco|Kiev Ukraine|
Stuttgart Germany|Dresden Germany|Leipzig Germany|Bremen Germany|Hanover Germany|Nuremberg Germany|Bologna Italy|
Genoa Italy|Palermo Italy|Verona Italy|Pisa Italy|Valencia Spain|Bilbao Spain|Malaga Spain|Granada Spain|
Zaragoza Spain|Toulouse France|Strasbourg France|Lille France|Nantes France|Cannes France|Yokohama Japan|
Nagoya Japan|Sapporo Japan|Hiroshima Japan|Kobe Japan|Fukuoka Japan|Shenzhen China|Guangzhou China|Wuhan China|
Chengdu China|Nanjing China|Hangzhou China|Bangalore India|Chennai India|Kolkata India|Hyderabad India|Pune India|
Novosibirsk Russia|Kazan Russia|Calgary Canada|Quebec Canada|Edmonton Canada|Winnipeg Canada|Brisbane Australia|
Perth Australia|Adelaide Australia|Sao Paulo Brazil|Brasilia Brazil|Salvador Brazil|Izmir Turkey|Gdansk Poland|
Wroclaw Poland|Rotterdam Netherlands|Utrecht Netherlands|Antwerp Belgium|Ghent Belgium|Gothenburg Sweden|
Malmo Sweden|Alexandria Egypt|Luxor Egypt|Guadalajara Mexico|Monterrey Mexico|Cancun Mexico|Lahore Pakistan|
Salzburg Austria|Innsbruck Austria|Basel Switzerland|Lausanne Switzerland|Glasgow Scotland|Birmingham England|
Leeds England|Oxford England|Cambridge England|Seville Spain|Marrakech Morocco|Tunis Tunisia|Algiers Algeria|
Seattle USA|Chicago USA|Boston USA|Houston USA|Dallas USA|Miami USA|Denver USA|Atlanta USA|Phoenix USA|
Philadelphia USA|Detroit USA|Las Vegas USA|Portland USA|Honolulu USA|Nashville USA|Minneapolis USA|
Edinburgh Scotland|Aberdeen Scotland|Dundee Scotland|Cardiff Wales|Swansea Wales|Belfast Ireland|Cork Ireland|
Bristol England|Sheffield England|Newcastle England|Nottingham England|Brighton England|York England|
Marseilles France|Grenoble France|Montpellier France|Rennes France|Dijon France|Reims France|Avignon France|
Dortmund Germany|Essen Germany|Dusseldorf Germany|Bonn Germany|Heidelberg Germany|Mannheim Germany|
Freiburg Germany|Augsburg Germany|Karlsruhe Germany|Wiesbaden Germany|Kiel Germany|Rostock Germany|
Catania Italy|Bari Italy|Trieste Italy|Padua Italy|Parma Italy|Siena Italy|Modena Italy|Rimini Italy|
Cordoba Spain|Alicante Spain|Murcia Spain|Toledo Spain|Salamanca Spain|Pamplona Spain|Cadiz Spain|
Coimbra Portugal|Faro Portugal|Braga Portugal|Thessaloniki Greece|Patras Greece|Heraklion Greece|
Ankara Turkey|Antalya Turkey|Bursa Turkey|Adana Turkey|Konya Turkey|Poznan Poland|Lodz Poland|Lublin Poland|
Saint Petersburg Russia|Yekaterinburg Russia|Samara Russia|Vladivostok Russia|Omsk Russia|Sochi Russia|
Kharkiv Ukraine|Odessa Ukraine|Lviv Ukraine|Bergen Norway|Trondheim Norway|Uppsala Sweden|Aarhus Denmark|
Tampere Finland|Turku Finland|Graz Austria|Linz Austria|Bern Switzerland|Lucerne Switzerland|Liege Belgium|
Bruges Belgium|Eindhoven Netherlands|Groningen Netherlands|The Hague Netherlands|Brno Czech Republic|
Debrecen Hungary|Cluj Romania|Timisoara Romania|Varna Bulgaria|Split Croatia|Dubrovnik Croatia|
Tianjin China|Xian China|Chongqing China|Harbin China|Qingdao China|Dalian China|Suzhou China|Kunming China|
Sendai Japan|Nara Japan|Okinawa Japan|Kawasaki Japan|Busan South Korea|Incheon South Korea|Daegu South Korea|
Ahmedabad India|Jaipur India|Lucknow India|Surat India|Kanpur India|Nagpur India|Varanasi India|Goa India|
Chiang Mai Thailand|Phuket Thailand|Ho Chi Minh City Vietnam|Da Nang Vietnam|Surabaya Indonesia|Bali Indonesia|
Cebu Philippines|Davao Philippines|Ottawa Canada|Halifax Canada|Victoria Canada|Hobart Australia|
Darwin Australia|Auckland New Zealand|Wellington New Zealand|Christchurch New Zealand|Recife Brazil|
Fortaleza Brazil|Curitiba Brazil|Porto Alegre Brazil|Manaus Brazil|Belo Horizonte Brazil|Rosario Argentina|
Mendoza Argentina|Valparaiso Chile|Medellin Colombia|Cali Colombia|Cartagena Colombia|
Cusco Peru|Quito Ecuador|Guayaquil Ecuador|Montevideo Uruguay|Tijuana Mexico|Acapulco Mexico|Puebla Mexico|
Johannesburg South Africa|Cape Town South Africa|Durban South Africa|Giza Egypt|Aswan Egypt|Fez Morocco|
Tangier Morocco|Accra Ghana|Dakar Senegal|Mombasa Kenya|Kampala Uganda|Dar es Salaam Tanzania|
Jeddah Saudi Arabia|Mecca Saudi Arabia|Medina Saudi Arabia|Dubai United Arab Emirates|Abu Dhabi United Arab Emirates|
Isfahan Iran|Shiraz Iran|Mosul Iraq|Basra Iraq|Aleppo Syria|Tel Aviv Israel|Haifa Israel|Jerusalem Israel|
Peshawar Pakistan|Dhaka Bangladesh|Colombo Sri Lanka|Kathmandu Nepal|Kabul Afghanistan|Tashkent Uzbekistan|
Almaty Kazakhstan|Baku Azerbaijan|Tbilisi Georgia|Yerevan Armenia|Minsk Belarus|Riga Latvia|Vilnius Lithuania|
Tallinn Estonia|Kuala Lumpur Malaysia|Penang Malaysia|Taipei Taiwan|Hong Kong China"""

_LANDMARKS = """Eiffel Tower Paris|Colosseum Rome|Big Ben London|Kremlin Moscow|Brandenburg Gate Berlin|
Sagrada Familia Barcelona|Acropolis Athens|Louvre Paris|Sydney Opera House Sydney|Forbidden City Beijing|
Tower of London London|Vatican Rome|Parthenon Athens|Buckingham Palace London|Red Square Moscow|
Arc de Triomphe Paris|Trevi Fountain Rome|Reichstag Berlin|Notre Dame Cathedral Paris|Alhambra Granada|
Prado Museum Madrid|Rijksmuseum Amsterdam|Hagia Sophia Istanbul|Blue Mosque Istanbul|Pantheon Rome|
Westminster Abbey London|Charles Bridge Prague|Tokyo Tower Tokyo|CN Tower Toronto|Space Needle Seattle|
Statue of Liberty New York|Golden Gate Bridge San Francisco|Empire State Building New York|Leaning Tower of Pisa Pisa|
Burj Khalifa Dubai|Uffizi Gallery Florence|Sistine Chapel Rome|British Museum London|London Eye London|
Times Square New York|Tate Modern London|St. Peter's Basilica Rome|Central Park New York|Champs-Elysees Paris|
Piccadilly Circus London|Tiananmen Square Beijing|Hermitage Museum Saint Petersburg|Brooklyn Bridge New York|
Alcatraz San Francisco|Hollywood Walk of Fame Los Angeles|White House Washington|Berlin Wall Berlin"""

_COMPANIES = """Toyota Japan|Honda Japan|Sony Japan|Nintendo Japan|Samsung South Korea|BMW Germany|Volkswagen Germany|
Siemens Germany|Fiat Italy|Ferrari Italy|Renault France|Peugeot France|Nokia Finland|IKEA Sweden|Volvo Sweden|
Nestle Switzerland|Philips Netherlands|Adidas Germany|Porsche Germany|Hyundai South Korea|Toshiba Japan|
Panasonic Japan|Ericsson Sweden|Heineken Netherlands|Lego Denmark|Michelin France|Airbus France|Bosch Germany|
Audi Germany|Lamborghini Italy|Mitsubishi Japan|Huawei China|Alibaba China|Tata India|Skoda Czech Republic"""

@dataclass(frozen=True)
class Candidate:
    relation: str
    subject: str
    obj: str  # with its leading space

    @property
    def prompt(self) -> str:
        return RELATIONS[self.relation][0]

    @property
    def paraphrases(self) -> list[str]:
        return RELATIONS[self.relation][1]


_PEOPLE = """Albert Einstein Germany|Wolfgang Amadeus Mozart Austria|Pablo Picasso Spain|William Shakespeare England|
Napoleon Bonaparte France|Dante Alighieri Italy|Mahatma Gandhi India|Confucius China|Leo Tolstoy Russia|
Ludwig van Beethoven Germany|Galileo Galilei Italy|Leonardo da Vinci Italy|Vincent van Gogh Netherlands|
Frederic Chopin Poland|Miguel de Cervantes Spain|Charles Dickens England|Victor Hugo France|Fyodor Dostoevsky Russia|
Johann Sebastian Bach Germany|Michelangelo Italy|Rembrandt Netherlands|Isaac Newton England|Marie Curie Poland|
Karl Marx Germany|Sigmund Freud Austria|Hans Christian Andersen Denmark|Akira Kurosawa Japan|Frida Kahlo Mexico|
Charles Darwin England|Claude Monet France"""


def _split(table: str) -> list[tuple[str, str]]:
    """'Subject words Object words|...' -> pairs; the object is the known last word(s) of each entry."""
    out = []
    known_multi = ("Buenos Aires", "New Delhi", "Addis Ababa", "Mexico City", "South Korea", "Czech Republic",
                   "New York", "San Francisco", "Los Angeles", "Saint Petersburg",
                   "South Africa", "New Zealand", "Saudi Arabia", "United Arab Emirates", "Sri Lanka")
    for entry in " ".join(table.split()).split("|"):
        entry = entry.strip()
        obj = next((m for m in known_multi if entry.endswith(" " + m)), entry.rsplit(" ", 1)[-1])
        out.append((entry[: -len(obj)].strip(), obj))
    return out


def candidates() -> list[Candidate]:
    """Every fact written here, relation by relation (574)."""
    tables = {"capital": _CAPITALS, "language": _LANGUAGES, "city_country": _CITIES, "landmark_city": _LANDMARKS,
              "company_country": _COMPANIES, "person_country": _PEOPLE}
    out = [Candidate(rel, s, " " + o) for rel, t in tables.items() for s, o in _split(t)]
    return list(dict.fromkeys(out))  # a (relation, subject, object) written twice counts once


__all__ = ["RELATIONS", "Candidate", "candidates"]
